"""VMs back from recovery points: run on the mount and moved, or restored (docs/RECOVERY.md)."""
