"""The reactor as the sidecar's parts see it: Twisted's interfaces.

A part that uses one of the reactor's roles takes that interface (`IReactorTime` for timers,
`IReactorFromThreads` to hand work to the reactor thread, ...). A part that uses several takes
`IReactor`, every role the sidecar uses combined, as `twisted.internet` itself types its global
reactor (`_IReactorCommon`). `default_reactor()` is the installed global reactor, typed so.
A leaf: it imports nothing of ours.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
)


class IReactor(IReactorCore, IReactorTime, IReactorThreads, IReactorTCP, IReactorPluggableNameResolver):
    """Every role of the reactor the sidecar uses; Twisted's default reactors provide them all."""


def default_reactor() -> IReactor:
    """The global reactor, installing the default one if none is yet (imported here, not at
    module import, so that importing the sidecar never picks the reactor)."""
    from twisted.internet import reactor  # noqa: PLC0415 - importing it installs a reactor

    return cast(IReactor, reactor)
