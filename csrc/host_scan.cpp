// The optimizers' host path in C++ (sparsetrain/scan.py): scans of tensor lists, one C call per list, and
// the event seeds of sparsetrain/philox.py, per-tensor scalar stores and loads for CPU tensors, and
// identity / equality checks of cached per-tensor objects.
//
// A step reads, for every parameter, its gradient and a few properties (dtype, shape, device,
// layout, contiguity, data pointer, version counter). Read attribute by attribute from Python these
// cost a few hundred nanoseconds per tensor, which for a few hundred tensors is more than the kernels
// of a step take on a GPU. These functions read them in one pass over a Python list. Objects that are
// not exactly torch.Tensor / nn.Parameter (subclasses may override attributes) and active torch
// function modes are handled through Python attribute access, as sparsetrain/scan.py's fallbacks do,
// so results never differ from Python's.
#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Whether ``obj`` can be read in C++ exactly as Python reads it: a plain Tensor or Parameter.
bool plain(PyObject* obj) { return THPVariable_CheckExact(obj) && !at::impl::torch_function_mode_enabled(); }

bool steppable_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// The checks every backend applies to a (parameter, gradient) pair, all passing, on the common layout:
// both dense and contiguous, same dtype (fp32, bf16 or fp16), shape and device.
bool plain_pair(const at::Tensor& p, const at::Tensor& g) {
  return p.layout() == at::kStrided && g.layout() == at::kStrided && g.scalar_type() == p.scalar_type() &&
         steppable_dtype(p.scalar_type()) && g.sizes().equals(p.sizes()) && g.device() == p.device() &&
         p.is_contiguous() && g.is_contiguous();
}

// ``arg`` as a list or tuple (a new reference), or nullptr with a TypeError.
PyObject* sequence(PyObject* arg, const char* name) {
  if (!PyList_Check(arg) && !PyTuple_Check(arg)) {
    PyErr_Format(PyExc_TypeError, "%s expects a list or tuple of tensors, got %s", name, Py_TYPE(arg)->tp_name);
    return nullptr;
  }
  Py_INCREF(arg);
  return arg;
}

// Owns the reference ``sequence`` returned.
struct Items {
  PyObject* seq;
  explicit Items(PyObject* s) : seq(s) {}
  Items(Items&& other) noexcept : seq(other.seq) { other.seq = nullptr; }
  Items(const Items&) = delete;
  Items& operator=(const Items&) = delete;
  ~Items() { Py_XDECREF(seq); }
  Py_ssize_t size() const { return PySequence_Fast_GET_SIZE(seq); }
  PyObject* operator[](Py_ssize_t i) const { return PySequence_Fast_GET_ITEM(seq, i); }
};

// grads(lists) -> (grads, presence, ids, plain) over the tensors of ``lists`` (a sequence of lists of
// parameters, e.g. each param group's), in order: each one's .grad (None when absent); a bytes object
// with 1 where a gradient is present; the objects' ids as native unsigned 64-bit integers (bytes, so
// that a parameter replaced by another object changes it); whether every present gradient passed
// plain_pair (objects not plain count as not passing).
PyObject* grads(PyObject* /*self*/, PyObject* arg) {
  HANDLE_TH_ERRORS
  Items lists(sequence(arg, "grads"));
  if (!lists.seq) return nullptr;
  std::vector<Items> groups;
  Py_ssize_t n = 0;
  for (Py_ssize_t j = 0; j < lists.size(); ++j) {
    groups.emplace_back(sequence(lists[j], "grads: each item"));
    if (!groups.back().seq) return nullptr;
    n += groups.back().size();
  }
  PyObject* out = PyList_New(n);
  if (!out) return nullptr;
  PyObject* presence = PyBytes_FromStringAndSize(nullptr, n);
  PyObject* ids = PyBytes_FromStringAndSize(nullptr, n * static_cast<Py_ssize_t>(sizeof(uint64_t)));
  if (!presence || !ids) {
    Py_DECREF(out);
    Py_XDECREF(presence);
    Py_XDECREF(ids);
    return nullptr;
  }
  char* present = PyBytes_AS_STRING(presence);
  char* id_bytes = PyBytes_AS_STRING(ids);
  bool all_plain = true;
  Py_ssize_t i = 0;
  for (const Items& group : groups) {
    for (Py_ssize_t k = 0; k < group.size(); ++k, ++i) {
      PyObject* obj = group[k];
      const uint64_t id = reinterpret_cast<uintptr_t>(obj);
      std::memcpy(id_bytes + i * sizeof(uint64_t), &id, sizeof(uint64_t));
      PyObject* grad = nullptr;
      if (plain(obj)) {
        const at::Tensor& p = THPVariable_Unpack(obj);
        const at::Tensor& g = p.grad();
        if (g.defined()) {
          grad = THPVariable_Wrap(g);
          if (grad && all_plain) all_plain = THPVariable_CheckExact(grad) && plain_pair(p, g);
        } else {
          Py_INCREF(Py_None);
          grad = Py_None;
        }
      } else {
        grad = PyObject_GetAttrString(obj, "grad");
        all_plain = all_plain && grad == Py_None;
      }
      if (!grad) {
        Py_DECREF(out);
        Py_DECREF(presence);
        Py_DECREF(ids);
        return nullptr;
      }
      present[i] = grad != Py_None;
      PyList_SET_ITEM(out, i, grad);
    }
  }
  return Py_BuildValue("(NNNO)", out, presence, ids, all_plain ? Py_True : Py_False);
  END_HANDLE_TH_ERRORS
}

// One 64-bit integer per tensor as native-endian bytes (compared with one memcmp, decoded with
// memoryview.cast): value(tensor) for plain tensors, else the Python attribute / method.
template <typename Value>
PyObject* per_tensor(PyObject* arg, const char* name, const char* attribute, bool call, Value value) {
  Items items(sequence(arg, name));
  if (!items.seq) return nullptr;
  const Py_ssize_t n = items.size();
  PyObject* out = PyBytes_FromStringAndSize(nullptr, n * static_cast<Py_ssize_t>(sizeof(int64_t)));
  if (!out) return nullptr;
  char* bytes = PyBytes_AS_STRING(out);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = items[i];
    int64_t item = 0;
    if (plain(obj)) {
      item = value(THPVariable_Unpack(obj));
    } else {
      PyObject* result = call ? PyObject_CallMethod(obj, attribute, nullptr) : PyObject_GetAttrString(obj, attribute);
      if (result) {
        item = static_cast<int64_t>(PyLong_AsUnsignedLongLongMask(result));
        Py_DECREF(result);
      }
      if (!result || PyErr_Occurred()) {
        Py_DECREF(out);
        return nullptr;
      }
    }
    std::memcpy(bytes + i * sizeof(int64_t), &item, sizeof(int64_t));
  }
  return out;
}

// versions(tensors) -> bytes of int64: [t._version for t in tensors]
PyObject* versions(PyObject* /*self*/, PyObject* arg) {
  HANDLE_TH_ERRORS
  return per_tensor(arg, "versions", "_version", false, [](const at::Tensor& t) {
    return static_cast<int64_t>(t._version());
  });
  END_HANDLE_TH_ERRORS
}

// data_ptrs(tensors) -> bytes of uint64: [t.data_ptr() for t in tensors]
PyObject* data_ptrs(PyObject* /*self*/, PyObject* arg) {
  HANDLE_TH_ERRORS
  return per_tensor(arg, "data_ptrs", "data_ptr", true, [](const at::Tensor& t) {
    return static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr()));
  });
  END_HANDLE_TH_ERRORS
}

// all_contiguous(tensors) -> all(t.is_contiguous() for t in tensors)
PyObject* all_contiguous(PyObject* /*self*/, PyObject* arg) {
  HANDLE_TH_ERRORS
  Items items(sequence(arg, "all_contiguous"));
  if (!items.seq) return nullptr;
  const Py_ssize_t n = items.size();
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = items[i];
    if (plain(obj)) {
      if (!THPVariable_Unpack(obj).is_contiguous()) Py_RETURN_FALSE;
      continue;
    }
    PyObject* result = PyObject_CallMethod(obj, "is_contiguous", nullptr);
    if (!result) return nullptr;
    const int truth = PyObject_IsTrue(result);
    Py_DECREF(result);
    if (truth < 0) return nullptr;
    if (!truth) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// event_seeds(base_seed, tensor_indices, event) -> int64 CPU tensor: sparsetrain.philox.event_seed of
// every index (the same splitmix64 mixing; Python ints are taken mod 2**64).
PyObject* event_seeds(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *base_obj, *indices_obj, *event_obj;
  if (!PyArg_ParseTuple(args, "OOO", &base_obj, &indices_obj, &event_obj)) return nullptr;
  const uint64_t base = PyLong_AsUnsignedLongLongMask(base_obj);
  if (PyErr_Occurred()) return nullptr;
  const uint64_t event = PyLong_AsUnsignedLongLongMask(event_obj);
  if (PyErr_Occurred()) return nullptr;
  Items indices(sequence(indices_obj, "event_seeds"));
  if (!indices.seq) return nullptr;
  const Py_ssize_t n = indices.size();
  at::Tensor out = at::empty({static_cast<int64_t>(n)}, at::kLong);
  int64_t* seeds = out.data_ptr<int64_t>();
  const uint64_t mixed_base = splitmix64(base);
  for (Py_ssize_t i = 0; i < n; ++i) {
    const uint64_t index = PyLong_AsUnsignedLongLongMask(indices[i]);
    if (PyErr_Occurred()) return nullptr;
    const uint64_t mixed = mixed_base ^ splitmix64((index << 32) | event);
    seeds[i] = static_cast<int64_t>(splitmix64(mixed) & 0x7FFFFFFFFFFFFFFFull);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// The one-element CPU tensors ``scalars`` and a contiguous CPU vector ``vector`` of their dtype (float32
// or float64) exchange values as plain loads and stores: GATHER, vector[i] = scalars[i] (the vector's
// version counter bumped once); otherwise scalars[i] = vector[i] (each scalar's version counter bumped,
// as copy_ bumps it). False, with nothing written, for anything else (CUDA tensors, other dtypes,
// subclasses): the caller then uses torch operations.
template <bool GATHER>
PyObject* transfer_elements(PyObject* args, const char* name) {
  PyObject *dst_obj, *src_obj;
  if (!PyArg_ParseTuple(args, "OO", &dst_obj, &src_obj)) return nullptr;
  PyObject* const vector_obj = GATHER ? dst_obj : src_obj;
  Items scalars(sequence(GATHER ? src_obj : dst_obj, name));
  if (!scalars.seq) return nullptr;
  if (!plain(vector_obj)) Py_RETURN_FALSE;
  const at::Tensor& vector = THPVariable_Unpack(vector_obj);
  const Py_ssize_t n = scalars.size();
  const auto dtype = vector.scalar_type();
  if (!vector.device().is_cpu() || vector.layout() != at::kStrided || !vector.is_contiguous() ||
      vector.dim() != 1 || vector.numel() != n || (dtype != at::kFloat && dtype != at::kDouble) ||
      vector.requires_grad() || vector.is_conj() || vector.is_neg() || !vector.has_storage()) {
    Py_RETURN_FALSE;
  }
  std::vector<at::TensorImpl*> impls;
  impls.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = scalars[i];
    if (!plain(obj)) Py_RETURN_FALSE;
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (!t.device().is_cpu() || t.layout() != at::kStrided || t.scalar_type() != dtype || t.numel() != 1 ||
        (!GATHER && t.requires_grad()) || t.is_conj() || t.is_neg() || !t.has_storage()) {
      Py_RETURN_FALSE;
    }
    impls.push_back(t.unsafeGetTensorImpl());
  }
  at::TensorImpl* vec = vector.unsafeGetTensorImpl();
  void* values = GATHER ? vec->mutable_data() : const_cast<void*>(vec->data());
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (dtype == at::kFloat) {
      float* scalar = static_cast<float*>(GATHER ? const_cast<void*>(impls[i]->data()) : impls[i]->mutable_data());
      if (GATHER) static_cast<float*>(values)[i] = *scalar; else *scalar = static_cast<float*>(values)[i];
    } else {
      double* scalar = static_cast<double*>(GATHER ? const_cast<void*>(impls[i]->data()) : impls[i]->mutable_data());
      if (GATHER) static_cast<double*>(values)[i] = *scalar; else *scalar = static_cast<double*>(values)[i];
    }
    if (!GATHER) impls[i]->bump_version();
  }
  if (GATHER) vec->bump_version();
  Py_RETURN_TRUE;
}

// copy_elements(dst, src) -> bool: dst[i].copy_(src[i]) for one-element tensors ``dst`` and a vector ``src``
PyObject* copy_elements(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  return transfer_elements<false>(args, "copy_elements");
  END_HANDLE_TH_ERRORS
}

// gather_elements(dst, src) -> bool: dst[i] = src[i] for a vector ``dst`` and one-element tensors ``src``
PyObject* gather_elements(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  return transfer_elements<true>(args, "gather_elements");
  END_HANDLE_TH_ERRORS
}

// items_are(mappings, key, expected) -> bool: len(mappings) == len(expected) and mappings[i][key] is
// expected[i] for every i (a missing key raises KeyError, as the Python fallback's itemgetter does).
PyObject* items_are(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *mappings_obj, *key, *expected_obj;
  if (!PyArg_ParseTuple(args, "OOO", &mappings_obj, &key, &expected_obj)) return nullptr;
  Items mappings(sequence(mappings_obj, "items_are"));
  if (!mappings.seq) return nullptr;
  Items expected(sequence(expected_obj, "items_are"));
  if (!expected.seq) return nullptr;
  const Py_ssize_t n = mappings.size();
  if (expected.size() != n) Py_RETURN_FALSE;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* mapping = mappings[i];
    PyObject* item;
    if (PyDict_CheckExact(mapping)) {
      item = PyDict_GetItemWithError(mapping, key);  // borrowed
      if (!item) {
        if (!PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, key);
        return nullptr;
      }
      if (item != expected[i]) Py_RETURN_FALSE;
    } else {
      item = PyObject_GetItem(mapping, key);  // new reference
      if (!item) return nullptr;
      const bool same = item == expected[i];
      Py_DECREF(item);
      if (!same) Py_RETURN_FALSE;
    }
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// attrs_equal(objects, name, values) -> bool: len(objects) == len(values) and getattr(objects[i], name)
// == values[i] for every i (compared as Python compares them: identity first, then ==).
PyObject* attrs_equal(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *objects_obj, *name, *values_obj;
  if (!PyArg_ParseTuple(args, "OUO", &objects_obj, &name, &values_obj)) return nullptr;
  Items objects(sequence(objects_obj, "attrs_equal"));
  if (!objects.seq) return nullptr;
  Items values(sequence(values_obj, "attrs_equal"));
  if (!values.seq) return nullptr;
  const Py_ssize_t n = objects.size();
  if (values.size() != n) Py_RETURN_FALSE;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* value = PyObject_GetAttr(objects[i], name);
    if (!value) return nullptr;
    const int equal = PyObject_RichCompareBool(value, values[i], Py_EQ);
    Py_DECREF(value);
    if (equal < 0) return nullptr;
    if (!equal) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"grads", grads, METH_O, "grads(lists of params) -> (grads, presence bytes, id bytes, all present gradients plain)"},
    {"versions", versions, METH_O, "versions(tensors) -> version counters as bytes of int64"},
    {"data_ptrs", data_ptrs, METH_O, "data_ptrs(tensors) -> data pointers as bytes of uint64"},
    {"all_contiguous", all_contiguous, METH_O, "all_contiguous(tensors) -> bool"},
    {"event_seeds", event_seeds, METH_VARARGS, "event_seeds(base_seed, tensor_indices, event) -> int64 tensor"},
    {"copy_elements", copy_elements, METH_VARARGS, "copy_elements(dst, src) -> whether it copied (CPU only)"},
    {"gather_elements", gather_elements, METH_VARARGS, "gather_elements(dst, src) -> whether it copied (CPU only)"},
    {"items_are", items_are, METH_VARARGS, "items_are(mappings, key, expected) -> all(m[key] is e ...)"},
    {"attrs_equal", attrs_equal, METH_VARARGS, "attrs_equal(objects, name, values) -> all(getattr(o, name) == v ...)"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyMethodDef* sparsetrain_scan_methods() { return methods; }
