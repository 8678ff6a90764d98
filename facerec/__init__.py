"""Training engine, configuration and command-line interface."""
