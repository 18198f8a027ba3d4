"""The packet log as a product: log, stats, export, replay, prune and retention.

`args` declares the commands' arguments and `cli` runs them; `filter` turns the
shared filters into one WHERE clause; `query` reads rows, `stats` aggregates them,
`render` prints both; `pcap` writes and reads captures, `replay` re-injects packets
into a TUN device; `retention` drops whole partitions by the owner's policy.
"""
