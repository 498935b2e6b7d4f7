"""Isthmus appliance: IKEv2 daemon, kernel data plane, tunnel hook, control socket and CLI."""

__version__ = "0.1.0"
