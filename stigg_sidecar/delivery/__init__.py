"""The write path: usage reports and events carried from the gRPC handlers to Stigg.

One path for every write, whether it goes to Stigg while the caller waits (direct) or is made
durable on disk first and delivered in the background (spooled, SPOOL_WRITES):

- `crossing.WriteGate`  the handler-thread side: one crossing to the reactor under the deadline.
- `upstream.UpstreamWrites`  the reactor side every write ends in: send a batch to Stigg, hand
  Stigg's authoritative answer to the store.
- `direct.DirectDelivery`  the Writer when the spool is off.
- `spooled.SpooledDelivery`  the Writer when SPOOL_WRITES is on; it builds its two sides:
  `accepting.SpoolAcceptor` (append, acknowledge, the pending usage) and `sending.SpoolSender`
  (batches to Stigg, backoff, dead letters), over `spool.SpoolFile` (SQLite) and `bodies`.

Reads, reloads and every cache change stay in `stigg_sidecar.online`; this package reaches the
store only through `contracts.UsageStore`.
"""
