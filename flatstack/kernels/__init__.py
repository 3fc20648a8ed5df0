"""Hot ops, one file each: a plain torch reference and the fast path, held equal by tests."""
