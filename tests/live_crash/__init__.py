"""Crash consistency of the live stack: SIGKILLed publishers, downloads and agents (issue 14 item 8)."""
