"""Split-horizon DNS: wire format, zone files, zone lookup, views and their listeners."""
