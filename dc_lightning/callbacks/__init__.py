"""Lightning callbacks: thin drivers that decide *when*; the algorithm modules decide *what*."""
