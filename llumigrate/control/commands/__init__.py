"""One module per control subcommand (`llumigrate instances`, `migrate`, ...),
each exposing `add_arguments(parser)` and `run(args) -> int` for
`llumigrate.cli.main.COMMANDS`."""
