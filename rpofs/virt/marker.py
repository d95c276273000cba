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


def runs_on_a_point(xml: str) -> bool:
    """Whether the domain is one `rpofs run` booted from a point, not moved
    yet: its disks read the repository, so backing it up or protecting it
    would copy the repository into itself. The one rule for every command
    and the ingester; once moved it is an ordinary VM."""
    marker = marker_of(xml)
    return bool(marker) and marker.get("kind") == "run"


def run_vm_refused(name: str, what: str) -> str:
    """The one line that says so."""
    return (f"VM {name} runs on a recovery point (rpofs run): its disks read the repository; "
            f"{what} it once moved (rpofs run --move {name} --dir DIR)")


def marker_of(xml: str) -> dict | None:
    """The rpofs:recovery attributes of a domain's XML, or None."""
    try:
        el = ET.fromstring(xml).find(f"./metadata/{MARKER_TAG}")
    except ET.ParseError:
        return None
    return dict(el.attrib) if el is not None else None
