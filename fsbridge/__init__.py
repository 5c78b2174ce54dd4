"""fsbridge: connects a FreeSWITCH PBX to the PlanFix telephony API."""

__version__ = "0.1.0"
