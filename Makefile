.PHONY: quickstart test compile debug build-deps bench clean

quickstart:        ## set up and serve the digits example
	scripts/quickstart.sh

test:              ## set up and run the whole test suite
	scripts/test.sh

compile: build-deps ## rebuild the Cython modules in place
	.venv/bin/python setup.py build_ext --inplace

debug: build-deps  ## rebuild with bounds checks and assertions (CLIPPER_DEBUG=1)
	CLIPPER_DEBUG=1 .venv/bin/python setup.py build_ext --inplace --force

build-deps:        ## what setup.py needs in .venv (pip builds in an isolated environment otherwise)
	.venv/bin/python -m pip install --quiet "setuptools>=77" wheel "Cython>=3.0.10,<3.4"

bench:             ## end-to-end benchmarks against the echo floor
	.venv/bin/python -m bench.run --scenario all

clean:
	rm -rf build clipper/_native/*.c clipper/_native/*.so *.egg-info
