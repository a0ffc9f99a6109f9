"""RETA3D: real-time animatable 3D Gaussian head generation, in JAX/Flax."""
