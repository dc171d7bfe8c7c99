"""The write path: usage reports and events carried from the gRPC handlers to Stigg.

One path for every write, whether it goes to Stigg while the caller waits (direct) or is made
durable on disk first and delivered in the background (spooled, SPOOL_WRITES):

- `crossing.WriteGate`  the handler-thread side: one crossing to the reactor under the deadline.
- `upstream.UpstreamWrites`  the reactor side every write ends in: send a batch to Stigg, apply
  Stigg's authoritative answer to the cache, build the acknowledgements.
- `direct.DirectDelivery`  the Writer when the spool is off.

Reads and cache updates stay in `stigg_sidecar.online.sidecar`; this package only asks it to apply usage.
"""
