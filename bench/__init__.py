"""navtwist's benchmark harness: `make bench` (side-by-side run) and `make soak`."""
