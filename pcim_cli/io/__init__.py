"""Reading and writing: plate geometry and layouts, TIFF fields, the model file, the OME-Zarr store,
the CSV summary and the run lock."""
