"""Built-in examples."""
