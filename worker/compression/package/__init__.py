"""What a job ships: the delivered model with everything needed to run it on raw inputs."""
