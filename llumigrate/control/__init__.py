"""The control API: a gRPC service (`proto/llumigrate/v1/control.proto`)
over a `ControlBackend`, its event bus, its client and its CLI commands."""
