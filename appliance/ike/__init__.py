"""The IKEv2 engine (RFC 7296). Sans-IO: no sockets, no clock, no kernel, no asyncio."""
