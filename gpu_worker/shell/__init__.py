"""The worker process's shell: the broker link and the loop that carries out the decisions."""
