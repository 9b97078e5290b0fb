"""Moving bytes between workers: framing, authentication, link shaping.

The TCP backend (asyncio streams) lives here; other backends (shared memory, NIXL, Mooncake)
would provide the same two calls, `send_msg` and `recv_msg`, over their own channel.
"""
