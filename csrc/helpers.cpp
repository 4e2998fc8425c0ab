// megaclm.data._helpers: the two index builds that are loops over every document / every sample.
//
// Built by setup.py at install time (optional extension); megaclm/data/helpers.py holds the numpy
// implementation of both with element-for-element identical output, and documents the semantics.
//
//   build_sample_idx_int32 / _int64(sizes, document_index, seq_length, num_samples)
//       -> (num_samples + 1, 2) array of (position in document_index, token offset)
//   build_blending_indices(left, right, p_left, root, size)
//       -> (dataset_index int32 (size,), dataset_sample_index int64 (size,))
//
// Floating point: the blending decision floor(p * n + 0.5) must round exactly as numpy does, so this
// file is compiled without FMA contraction (setup.py passes -ffp-contract=off).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>

namespace py = pybind11;

namespace {

// Sample i spans the token stream of the documents listed in document_index from boundary i to
// boundary i+1 inclusive (seq_length + 1 tokens: inputs and shifted labels share all but one token).
// Boundary j sits at stream position j * seq_length: the first document k whose end lies past that
// position (empty documents are skipped), and the offset of the position inside document k.
template <typename T>
py::array_t<T> build_sample_idx(py::array_t<int32_t, py::array::c_style | py::array::forcecast> sizes_,
                                py::array_t<int32_t, py::array::c_style | py::array::forcecast> document_index_,
                                int64_t seq_length, int64_t num_samples) {
    if (seq_length < 1) throw std::invalid_argument("seq_length must be >= 1");
    if (num_samples < 0) throw std::invalid_argument("num_samples must be >= 0");
    const int32_t *sizes = sizes_.data();
    const int32_t *doc = document_index_.data();
    const int64_t n_sizes = sizes_.shape(0);
    const int64_t n_doc = document_index_.shape(0);

    py::array_t<T> out({num_samples + 1, int64_t{2}});
    T *idx = out.mutable_data();
    bool ok = true;
    {
        py::gil_scoped_release release;
        int64_t k = 0;         // position in document_index of the current document
        int64_t doc_end = 0;   // stream position one past the current document
        if (n_doc > 0) {
            if (doc[0] < 0 || doc[0] >= n_sizes) ok = false;
            else doc_end = sizes[doc[0]];
        }
        idx[0] = 0;
        idx[1] = 0;
        for (int64_t j = 1; ok && j <= num_samples; ++j) {
            const int64_t pos = j * seq_length;
            while (doc_end <= pos) {
                if (++k >= n_doc) { ok = false; break; }
                const int32_t d = doc[k];
                if (d < 0 || d >= n_sizes) { ok = false; break; }
                doc_end += sizes[d];
            }
            if (!ok) break;
            idx[2 * j] = static_cast<T>(k);
            idx[2 * j + 1] = static_cast<T>(pos - (doc_end - sizes[doc[k]]));
        }
    }
    if (!ok)
        throw std::invalid_argument("document_index runs out of tokens (or holds an id outside sizes) "
                                    "before num_samples samples");
    return out;
}

// Blending tree: internal node i sends the n-th sample reaching it (n = 0, 1, ...) to its left child
// iff floor(p_left[i] * (n + 1) + 0.5) > floor(p_left[i] * n + 0.5); the sample's number inside the
// chosen child is the count of earlier samples that went the same way. A child c < 0 is the leaf of
// dataset -(c + 1), where that number is the sample's index inside the dataset.
std::pair<py::array_t<int32_t>, py::array_t<int64_t>> build_blending_indices(
    py::array_t<int32_t, py::array::c_style | py::array::forcecast> left_,
    py::array_t<int32_t, py::array::c_style | py::array::forcecast> right_,
    py::array_t<double, py::array::c_style | py::array::forcecast> p_left_, int32_t root, int64_t size) {
    if (size < 0) throw std::invalid_argument("size must be >= 0");
    const int64_t n_nodes = left_.shape(0);
    if (right_.shape(0) != n_nodes || p_left_.shape(0) != n_nodes)
        throw std::invalid_argument("left, right and p_left must have the same length");
    if (root >= n_nodes) throw std::invalid_argument("root is not a node of the tree");
    const int32_t *left = left_.data();
    const int32_t *right = right_.data();
    const double *p_left = p_left_.data();
    for (int64_t i = 0; i < n_nodes; ++i)
        if (left[i] >= n_nodes || right[i] >= n_nodes) throw std::invalid_argument("child index out of range");

    py::array_t<int32_t> dataset_index(size);
    py::array_t<int64_t> dataset_sample_index(size);
    int32_t *ds = dataset_index.mutable_data();
    int64_t *ds_sample = dataset_sample_index.mutable_data();
    {
        py::gil_scoped_release release;
        for (int64_t s = 0; s < size; ++s) {
            int32_t node = root;
            int64_t n = s;
            while (node >= 0) {
                const double p = p_left[node];
                const int64_t before = static_cast<int64_t>(std::floor(p * static_cast<double>(n) + 0.5));
                const int64_t after = static_cast<int64_t>(std::floor(p * static_cast<double>(n + 1) + 0.5));
                if (after > before) {
                    n = before;
                    node = left[node];
                } else {
                    n -= before;
                    node = right[node];
                }
            }
            ds[s] = -(node + 1);
            ds_sample[s] = n;
        }
    }
    return {dataset_index, dataset_sample_index};
}

}  // namespace

PYBIND11_MODULE(_helpers, m) {
    m.doc() = "megaclm data index builders (C++); see megaclm/data/helpers.py";
    m.def("build_sample_idx_int32", &build_sample_idx<int32_t>, py::arg("sizes"), py::arg("document_index"),
          py::arg("seq_length"), py::arg("num_samples"));
    m.def("build_sample_idx_int64", &build_sample_idx<int64_t>, py::arg("sizes"), py::arg("document_index"),
          py::arg("seq_length"), py::arg("num_samples"));
    m.def("build_blending_indices", &build_blending_indices, py::arg("left"), py::arg("right"), py::arg("p_left"),
          py::arg("root"), py::arg("size"));
}
