"""Training: the plumbing every recipe shares (:mod:`.common`) and the bi-encoder's parts (:mod:`.biencoder`)."""
