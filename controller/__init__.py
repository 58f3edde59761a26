"""km's operator side: profiles, the compiler, substrates, state and the CLI."""
