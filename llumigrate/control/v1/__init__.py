"""Generated from proto/llumigrate/v1/control.proto by
`python -m llumigrate.control.codegen`. Do not edit; regenerate."""
