"""Source extraction for trap-dask: background/noise maps, islands, Gaussian fits, forced fits.

Written on numpy/scipy/astropy. Typical use on a worker::

    from trap_dask.extraction.extract import extract_sources, prepare_image
    from trap_dask.extraction.forced import fit_pairs, forced_fit

    image = prepare_image(data, wcs, beam, params)    # keep it for the forced fits
    detections = extract_sources(image, params)       # SOURCE_DTYPE rows
    nulls = forced_fit(image, ra, dec, params)        # SOURCE_DTYPE rows, is_force_fit=True
    pairs, ok = fit_pairs(image, ra2, dec2, params)   # (n, 2) rows: two point sources fitted together

``params`` is an :class:`~trap_dask.extraction.params.ExtractionParams`. The package imports none
of its modules itself: each user imports the ones it uses.
"""
