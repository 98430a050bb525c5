"""The sweep: the promoter's rules (pure), and later the Ray Tune scheduler, trainable and driver."""
