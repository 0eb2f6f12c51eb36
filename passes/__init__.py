"""Graph analysis passes over fx graphs of a training iteration."""
