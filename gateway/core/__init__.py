"""The server's data path, one way: NATS JetStream -> bus -> hub -> per-connection queue -> channel.

`bus` (the instance's one consumer), `hub` (the only writer of connection state) with its parts
`index` (subscriptions and permission flags), `queue` (bounded per-connection queue, coalescing),
`writer` (write scheduling) and `expiry` (token expiry); `replay` and `history` read JetStream back.
"""
