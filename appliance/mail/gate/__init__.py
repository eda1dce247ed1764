"""The SMTP gate against spam (MISSION M-10): policy objects the SMTP protocol consults.

See :mod:`appliance.mail.gate.gate` for the order of checks; each check has
its own module and settings dataclass.
"""

from __future__ import annotations

from appliance.mail.gate.access import AccessMap, AccessMapError, AccessSettings, check_access_file
from appliance.mail.gate.dnsbl import DNSBLSettings, DNSBLZone
from appliance.mail.gate.domains import DomainSettings
from appliance.mail.gate.gate import Gate, GateSettings, check_gate_settings, explain
from appliance.mail.gate.greet import PREGREET_REPLY, GreetPauseSettings
from appliance.mail.gate.greylist import GreylistSettings
from appliance.mail.gate.headers import HeaderRule, HeaderSettings
from appliance.mail.gate.spf import SPFEvaluator, SPFResult, SPFSettings
from appliance.mail.gate.verdict import Action, Session, Verdict

__all__ = [
    "PREGREET_REPLY",
    "AccessMap",
    "AccessMapError",
    "AccessSettings",
    "Action",
    "DNSBLSettings",
    "DNSBLZone",
    "DomainSettings",
    "Gate",
    "GateSettings",
    "GreetPauseSettings",
    "GreylistSettings",
    "HeaderRule",
    "HeaderSettings",
    "SPFEvaluator",
    "SPFResult",
    "SPFSettings",
    "Session",
    "Verdict",
    "check_access_file",
    "check_gate_settings",
    "explain",
]
