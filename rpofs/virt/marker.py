"""The marker rpofs leaves in a recovered VM's definition: an
rpofs:recovery element in its <metadata> saying which point it was
recovered from (kind "run": it reads its disks from the repository), so
the ingester and continuous protection know it from the domain alone,
without the repository.

Written by rpofs.recover.domainxml into a recovery's definition; read here,
below every floor that reads it: neither the ingester (rpofs.ingest.daemon)
nor rpofs.protect copies the repository into itself by backing up or
protecting a VM that runs on a point. Pure: XML text in."""

from xml.etree import ElementTree as ET

MARKER_NS = "https://rpofs.dev/xmlns/recovery/1"
MARKER_TAG = f"{{{MARKER_NS}}}recovery"
ET.register_namespace("rpofs", MARKER_NS)


def marker_of(xml: str) -> dict | None:
    """The rpofs:recovery attributes of a domain's XML, or None."""
    try:
        el = ET.fromstring(xml).find(f"./metadata/{MARKER_TAG}")
    except ET.ParseError:
        return None
    return dict(el.attrib) if el is not None else None
