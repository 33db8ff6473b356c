"""Judge: the scenes' own scoring network, trained on the real scenes."""
