"""The appliance: a small organisation's gateway (split-horizon DNS, SMTP, queue, POP3) in one Twisted process."""

__version__ = "0.1.0"
