"""twistd plugin: ``twistd appliance --config PATH``."""

from twisted.application.service import ServiceMaker

appliance = ServiceMaker(
    "appliance",
    "appliance.tap",
    "The gateway appliance: split-horizon DNS, SMTP, submission, queue and POP3",
    "appliance",
)
