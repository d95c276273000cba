"""Application logs shipped from inside the guest (docs/APPS.md): what is
read (ship), how (guestio), which block point it extends (relate), where it
is recorded (catalog), and the files as of a point (view, wal)."""
