"""PIUmr reference model: X3D backbone, TFAM, training objective."""
