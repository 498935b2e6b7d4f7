"""The kernel data plane: XFRM SAs and policies over netlink, XFRM interfaces, routes."""
