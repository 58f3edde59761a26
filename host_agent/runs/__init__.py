"""Agent runs: the run dir layout, the wrapper tmux executes, and the daemon component that starts them."""
