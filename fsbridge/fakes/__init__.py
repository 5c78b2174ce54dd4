"""Fake FreeSWITCH and PlanFix peers on loopback: shared by the tests, the benchmark and the demo."""
