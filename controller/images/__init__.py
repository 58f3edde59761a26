"""Images: recipes in amis/, the local image store, and baking."""
