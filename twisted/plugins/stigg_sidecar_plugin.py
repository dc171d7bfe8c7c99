from twisted.application.service import ServiceMaker

StiggSidecar = ServiceMaker(
    "stigg-sidecar",
    "stigg_sidecar.tap",
    "Stigg entitlement checks over gRPC, answered from a local cache.",
    "stigg-sidecar",
)
