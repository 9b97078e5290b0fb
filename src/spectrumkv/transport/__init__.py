"""Moving bytes between workers: framing, authentication, link shaping, push transfers.

The TCP backend (`framing.Channel`: asyncio, optional TLS, message bodies received straight
into their own buffers) lives here; other backends (shared memory, NIXL, Mooncake) would
provide the same two calls, `send` and `recv`, over their own channel.
"""
