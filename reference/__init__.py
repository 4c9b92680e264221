"""memarch reference implementations: literal, slow, one equation per line; the executable spec."""
