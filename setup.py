"""mpvss_ros as a plain Python package: ``pip install .`` / ``pip install -e .`` (no ROS needed).

ROS 2 (Humble/Jazzy) does not use this file: package.xml declares ``ament_cmake`` and
CMakeLists.txt generates the messages and installs the same ``mpvss_ros`` sources, launch files,
config and models. Here, data files go to ``<prefix>/share/mpvss_ros`` (config, launch, models,
package.xml and the ament index marker ``resource/mpvss_ros``), where
:func:`mpvss_ros.paths.data_roots` finds them.
"""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "mpvss_ros"


def _files(pattern: str) -> list[str]:
    return sorted(p for p in glob(pattern) if not p.endswith("/"))


setup(
    name=PACKAGE,
    version="0.1.0",
    description="Real-time video semantic segmentation (MPVSS: key frames + query-based flow) for ROS 2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/config", _files("config/*.yaml") + _files("config/*.rviz")),
        (f"share/{PACKAGE}/config/models", _files("config/models/*.yaml")),
        (f"share/{PACKAGE}/launch", _files("launch/*.py")),
        (f"share/{PACKAGE}/models", _files("models/*.pt") + _files("models/*.md")),
    ],
    # Floors: the oldest versions the whole test suite has passed with (README, "Library versions"):
    # Ubuntu 22.04's numpy, OpenCV, SciPy, matplotlib, Pillow, PyYAML and tqdm with torch 2.1.2;
    # mpvss_ros/dependencies.py checks the same floors when a command or the node starts.
    install_requires=[
        "numpy>=1.21.5",
        "opencv-python-headless>=4.5.4",
        "torch>=2.1.2",
        "pyyaml>=5.4.1",
        "tqdm>=4.57.0",
        "scipy>=1.8.0",
        "matplotlib>=3.5.1",
        "pillow>=9.0.1",  # EXIF orientation of image-folder JPEGs (matplotlib needs it too)
        "rosbags>=0.11.6",  # the bag tests pass from 0.11.6 (0.11.0 and 0.11.3-0.11.5 fail three: CDR errors, SIGTERM clean-up)
        "scikit-video>=1.1.11",
        "onnx>=1.17",
        "onnxruntime>=1.12.1",
        "simplejpeg>=1.9",
    ],
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "catkin_pkg>=0.5"]},
    zip_safe=False,
    maintainer="mpvss_ros developers",
    maintainer_email="mpvss-ros@example.org",
    tests_require=["pytest"],
    entry_points={"console_scripts": ["mpvss = mpvss_ros.__main__:main"]},
)
