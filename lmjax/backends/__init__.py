"""Whatever exists only to make one backend fast, applied at one point, each trick measured."""
