"""The generated region dataset: scenes of shapes and composite objects with exact masks, and their records."""
