from twisted.application.service import ServiceMaker

about = "A local stand-in for Stigg's API (Edge, GraphQL, admin) for development and tests."
emulator = ServiceMaker("stigg-emulator", "stigg_sidecar.emulator.tap", about, "stigg-emulator")
