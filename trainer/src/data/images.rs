//! Labelled images: an ImageFolder tree (`root/<class>/<image>.png|jpg|jpeg`, classes in
//! sorted order as torchvision's `ImageFolder` has them), decoded when a batch needs them,
//! or IDX files (the MNIST layout: `...-images-idx3-ubyte` with its
//! `...-labels-idx1-ubyte` beside it, gzipped or not), held in memory.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use ringmaster_crds::{DataFormat, DataSpec};

use super::augment::{Pixels, Transform};
use super::batches::{Batch, Examples, Input};
use super::{Labelled, hold_out};
use crate::error::{Error, Result, io_error};
use crate::rng::TrainRng;

const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// One labelled image.
#[derive(Debug, Clone)]
pub struct ImageItem {
    pub source: ImageSource,
    pub label: usize,
}

#[derive(Debug, Clone)]
pub enum ImageSource {
    /// A PNG or JPEG file, decoded per batch.
    File(PathBuf),
    /// Grey pixels from an IDX file (`width` x `height`, row-major).
    Grey {
        width: usize,
        height: usize,
        data: Arc<[u8]>,
    },
}

/// Reads `spec.train` (and `spec.validation`, or holds out `validationSplit` of the
/// training images, chosen by `seed`). `labels`: the spec's names; empty means the
/// sorted class directories (ImageFolder) or `0..=max label` (IDX).
pub fn load(spec: &DataSpec, labels: &[String], seed: u64) -> Result<Labelled<ImageItem>> {
    let train_path = Path::new(&spec.train);
    let (mut train, labels) = read(train_path, spec.format, labels)?;
    if labels.len() < 2 {
        return Err(Error::Config(format!(
            "{}: the data has {} class(es); classification needs at least 2",
            train_path.display(),
            labels.len()
        )));
    }
    let validation = match &spec.validation {
        Some(path) => read(Path::new(path), spec.format, &labels)?.0,
        None => hold_out(&mut train, spec.validation_split, seed),
    };
    Ok(Labelled {
        train,
        validation,
        labels,
    })
}

fn read(
    path: &Path,
    format: DataFormat,
    labels: &[String],
) -> Result<(Vec<ImageItem>, Vec<String>)> {
    let (items, labels) = match format {
        DataFormat::Imagefolder => read_image_folder(path, labels)?,
        DataFormat::Idx => read_idx(path, labels)?,
        other => {
            return Err(Error::Config(format!(
                "{}: format {other:?} is not an image format (imagefolder, idx)",
                path.display()
            )));
        }
    };
    if items.is_empty() {
        return Err(Error::Config(format!(
            "{}: the dataset has no images",
            path.display()
        )));
    }
    Ok((items, labels))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = std::fs::read_dir(dir)
        .map_err(io_error("reading the image folder", dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(io_error("reading the image folder", dir))?;
    entries.sort();
    Ok(entries)
}

fn read_image_folder(root: &Path, labels: &[String]) -> Result<(Vec<ImageItem>, Vec<String>)> {
    let classes: Vec<PathBuf> = sorted_entries(root)?
        .into_iter()
        .filter(|p| p.is_dir())
        .collect();
    let name = |p: &Path| {
        p.file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    };
    let labels: Vec<String> = if labels.is_empty() {
        classes.iter().map(|p| name(p)).collect()
    } else {
        labels.to_vec()
    };
    let mut items = Vec::new();
    for class_dir in &classes {
        let class = name(class_dir);
        let label = labels.iter().position(|l| *l == class).ok_or_else(|| {
            Error::Config(format!(
                "{}: class directory {class:?} is not one of the labels {labels:?}",
                class_dir.display()
            ))
        })?;
        for file in sorted_entries(class_dir)? {
            let extension = file
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            if !file.is_file() || !IMAGE_EXTENSIONS.contains(&extension.as_str()) {
                continue;
            }
            // The header now, so an unreadable file stops the run before training.
            image::ImageReader::open(&file)
                .map_err(io_error("opening an image", &file))?
                .with_guessed_format()
                .map_err(io_error("reading an image", &file))?
                .into_dimensions()
                .map_err(|e| {
                    Error::Config(format!("{}: not a readable image: {e}", file.display()))
                })?;
            items.push(ImageItem {
                source: ImageSource::File(file),
                label,
            });
        }
    }
    Ok((items, labels))
}

/// The whole file, gunzipped when it starts with the gzip magic.
fn read_maybe_gzipped(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(io_error("reading an IDX file", path))?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(raw.as_slice())
        .read_to_end(&mut out)
        .map_err(|e| Error::Config(format!("{}: damaged gzip data: {e}", path.display())))?;
    Ok(out)
}

/// An IDX file of u8 values: its dimensions and the data after the header.
fn parse_idx<'a>(bytes: &'a [u8], path: &Path, rank: usize) -> Result<(Vec<usize>, &'a [u8])> {
    let bad = |why: String| Error::Config(format!("{}: not an IDX file: {why}", path.display()));
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("no IDX magic (00 00 type rank)".into()));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!(
            "element type 0x{:02x}, expected 0x08 (u8)",
            bytes[2]
        )));
    }
    if bytes[3] as usize != rank {
        return Err(bad(format!("{} dimensions, expected {rank}", bytes[3])));
    }
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(bad("truncated header".into()));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks(4)
        .map(|d| u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize)
        .collect();
    let expected: usize = dims.iter().product();
    let data = &bytes[header..];
    if data.len() != expected {
        return Err(bad(format!(
            "dimensions {dims:?} need {expected} bytes of data, the file has {}",
            data.len()
        )));
    }
    Ok((dims, data))
}

/// `x-images-idx3-ubyte[.gz]` -> `x-labels-idx1-ubyte[.gz]` (the MNIST naming).
fn labels_file(images: &Path) -> Result<PathBuf> {
    let name = images.file_name().unwrap_or_default().to_string_lossy();
    if !name.contains("images-idx3") {
        return Err(Error::Config(format!(
            "{}: an IDX images file is named like train-images-idx3-ubyte[.gz], with its \
             labels in train-labels-idx1-ubyte[.gz] beside it",
            images.display()
        )));
    }
    Ok(images.with_file_name(name.replace("images-idx3", "labels-idx1")))
}

fn read_idx(images_path: &Path, labels: &[String]) -> Result<(Vec<ImageItem>, Vec<String>)> {
    let labels_path = labels_file(images_path)?;
    let image_bytes = read_maybe_gzipped(images_path)?;
    let label_bytes = read_maybe_gzipped(&labels_path)?;
    let (dims, pixels) = parse_idx(&image_bytes, images_path, 3)?;
    let (label_dims, classes) = parse_idx(&label_bytes, &labels_path, 1)?;
    let (count, height, width) = (dims[0], dims[1], dims[2]);
    if label_dims[0] != count {
        return Err(Error::Config(format!(
            "{} holds {count} images but {} holds {} labels",
            images_path.display(),
            labels_path.display(),
            label_dims[0]
        )));
    }
    let labels: Vec<String> = if labels.is_empty() {
        let top = classes.iter().copied().max().unwrap_or(0);
        (0..=top).map(|c| c.to_string()).collect()
    } else {
        labels.to_vec()
    };
    let plane = width * height;
    let items = classes
        .iter()
        .enumerate()
        .map(|(i, &class)| {
            let label = usize::from(class);
            if label >= labels.len() {
                return Err(Error::Config(format!(
                    "{}: item {i} has label {label}, outside the {} labels {labels:?}",
                    labels_path.display(),
                    labels.len()
                )));
            }
            Ok(ImageItem {
                source: ImageSource::Grey {
                    width,
                    height,
                    data: pixels[i * plane..(i + 1) * plane].into(),
                },
                label,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((items, labels))
}

/// Labelled images and the transform that turns them into model input.
pub struct ImageExamples {
    items: Vec<ImageItem>,
    transform: Transform,
}

impl ImageExamples {
    pub fn new(items: Vec<ImageItem>, transform: Transform) -> Self {
        Self { items, transform }
    }
}

impl Examples for ImageExamples {
    fn len(&self) -> usize {
        self.items.len()
    }

    fn label(&self, index: usize) -> usize {
        self.items[index].label
    }

    fn batch(&self, indices: &[usize], mut augment: Option<TrainRng>) -> Result<Batch> {
        let per_image = self.transform.output_len();
        let mut values = vec![0f32; indices.len() * per_image];
        for (&i, out) in indices.iter().zip(values.chunks_mut(per_image)) {
            let rng = augment.as_mut();
            match &self.items[i].source {
                ImageSource::Grey {
                    width,
                    height,
                    data,
                } => {
                    let pixels = Pixels {
                        width: *width,
                        height: *height,
                        channels: 1,
                        data,
                    };
                    self.transform.apply(&pixels, rng, out);
                }
                ImageSource::File(path) => {
                    let decoded = image::open(path).map_err(|e| {
                        Error::Config(format!("{}: cannot decode the image: {e}", path.display()))
                    })?;
                    let rgb = decoded.to_rgb8();
                    let pixels = Pixels {
                        width: rgb.width() as usize,
                        height: rgb.height() as usize,
                        channels: 3,
                        data: rgb.as_raw(),
                    };
                    self.transform.apply(&pixels, rng, out);
                }
            }
        }
        let n = indices.len();
        let size = self.transform.size;
        let labels: Vec<u32> = indices.iter().map(|&i| self.label(i) as u32).collect();
        let cpu = Device::Cpu;
        Ok(Batch {
            input: Input::Images(Tensor::from_vec(values, (n, 3, size, size), &cpu)?),
            labels: Tensor::from_vec(labels, n, &cpu)?,
            size: n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn spec(format: &str, train: &Path) -> DataSpec {
        serde_yaml::from_str(&format!(
            "{{train: {:?}, format: {format}, validationSplit: 0.25}}",
            train.display().to_string()
        ))
        .unwrap()
    }

    fn write_idx(path: &Path, dims: &[u32], data: &[u8], gzip: bool) {
        let mut bytes = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            bytes.extend(d.to_be_bytes());
        }
        bytes.extend(data);
        let file = std::fs::File::create(path).unwrap();
        if gzip {
            let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
            gz.write_all(&bytes).unwrap();
            gz.finish().unwrap();
        } else {
            std::io::BufWriter::new(file).write_all(&bytes).unwrap();
        }
    }

    #[test]
    fn idx_gzipped_with_labels_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("train-images-idx3-ubyte.gz");
        let pixels: Vec<u8> = (0..8 * 4 * 4).map(|i| i as u8).collect();
        write_idx(&images, &[8, 4, 4], &pixels, true);
        let labels_path = dir.path().join("train-labels-idx1-ubyte.gz");
        write_idx(&labels_path, &[8], &[0, 1, 2, 0, 1, 2, 0, 1], true);
        let data = load(&spec("idx", &images), &[], 3).unwrap();
        assert_eq!(data.labels, ["0", "1", "2"]);
        assert_eq!((data.train.len(), data.validation.len()), (6, 2));

        let examples = ImageExamples::new(
            data.train,
            Transform {
                size: 8,
                augmentation: None,
            },
        );
        let batch = examples.batch(&[0, 1], None).unwrap();
        let Input::Images(x) = batch.input else {
            panic!("an image batch")
        };
        assert_eq!(x.dims(), [2, 3, 8, 8]);

        // A label outside the spec's label set, and a count mismatch, name the file.
        let err = load(&spec("idx", &images), &["a".into(), "b".into()], 3).unwrap_err();
        assert!(err.to_string().contains("item 2 has label 2"), "{err}");
        write_idx(&labels_path, &[7], &[0; 7], true);
        let err = load(&spec("idx", &images), &[], 3).unwrap_err();
        assert!(err.to_string().contains("holds 7 labels"), "{err}");
        write_idx(&images, &[8, 4, 4], &pixels[..100], false);
        let err = load(&spec("idx", &images), &[], 3).unwrap_err();
        assert!(err.to_string().contains("need 128 bytes"), "{err}");
    }

    #[test]
    fn image_folder_classes_in_sorted_order_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        for (class, count) in [("dog", 3), ("cat", 2)] {
            std::fs::create_dir_all(dir.path().join(class)).unwrap();
            for i in 0..count {
                let img = image::RgbImage::from_fn(10, 6, |x, y| {
                    image::Rgb([x as u8 * 20, y as u8 * 30, i])
                });
                let ext = if i % 2 == 0 { "png" } else { "jpg" };
                img.save(dir.path().join(class).join(format!("{i}.{ext}")))
                    .unwrap();
            }
        }
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let mut s = spec("imagefolder", dir.path());
        s.validation_split = 0.0;
        let data = load(&s, &[], 1).unwrap();
        assert_eq!(data.labels, ["cat", "dog"]);
        assert_eq!(data.train.len(), 5);
        assert_eq!(data.train[0].label, 0);
        let examples = ImageExamples::new(
            data.train,
            Transform {
                size: 12,
                augmentation: None,
            },
        );
        let batch = examples.batch(&[0, 4], None).unwrap();
        assert_eq!(batch.labels.to_vec1::<u32>().unwrap(), [0, 1]);

        let err = load(&s, &["cat".into(), "bird".into()], 1).unwrap_err();
        assert!(err.to_string().contains("\"dog\" is not one of"), "{err}");
        std::fs::write(dir.path().join("cat/broken.png"), b"not a png").unwrap();
        let err = load(&s, &[], 1).unwrap_err();
        assert!(err.to_string().contains("broken.png"), "{err}");
    }
}
