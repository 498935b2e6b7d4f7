"""The route manager: ExaBGP neighbors on tunnel interfaces, policy, best path, FIB writer."""
