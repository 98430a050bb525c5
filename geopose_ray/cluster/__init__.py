"""The Ray side of the sweep: the only sub-package that imports Ray."""
