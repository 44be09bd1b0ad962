// The activation table for the C++ and CUDA kernels. Ids match deqkern/activations.py.
// Adding an activation: one enum value, one name in parse_activation, one case in each switch below.
#pragma once

#include <cmath>
#include <string>

#include <c10/util/Exception.h>

#include "host_device.h"

namespace deqkern {

// Unqualified tanh/exp/fabs must pick the float overloads on the host too (::tanh would promote to double).
using std::exp;
using std::fabs;
using std::tanh;

enum class ActivationId : int { Identity = 0, Relu = 1, Tanh = 2, Sigmoid = 3, Softsign = 4, Relu6 = 5 };

inline ActivationId parse_activation(const std::string& name) {
  if (name == "identity") return ActivationId::Identity;
  if (name == "relu") return ActivationId::Relu;
  if (name == "tanh") return ActivationId::Tanh;
  if (name == "sigmoid") return ActivationId::Sigmoid;
  if (name == "softsign") return ActivationId::Softsign;
  if (name == "relu6") return ActivationId::Relu6;
  TORCH_CHECK(false, "deqkern: unknown activation '", name,
              "'; choose one of identity, relu, tanh, sigmoid, softsign, relu6");
}

// act(u). A switch on a value that is uniform across the launch costs nothing next to the d
// multiply-adds behind every output, and keeps one kernel instantiation for all activations.
template <typename T>
DEQKERN_HOST_DEVICE T activation_forward(ActivationId id, T u) {
  switch (id) {
    case ActivationId::Relu: return u > T(0) ? u : T(0);
    case ActivationId::Tanh: return tanh(u);
    case ActivationId::Sigmoid: return T(1) / (T(1) + exp(-u));
    case ActivationId::Softsign: return u / (T(1) + fabs(u));
    case ActivationId::Relu6: return u < T(0) ? T(0) : (u > T(6) ? T(6) : u);
    case ActivationId::Identity:
    default: return u;
  }
}

// act'(u), with the subgradient 0 at the kinks of relu and relu6 (as the reference).
template <typename T>
DEQKERN_HOST_DEVICE T activation_derivative(ActivationId id, T u) {
  switch (id) {
    case ActivationId::Relu: return u > T(0) ? T(1) : T(0);
    case ActivationId::Tanh: {
      T t = tanh(u);
      return T(1) - t * t;
    }
    case ActivationId::Sigmoid: {
      T s = T(1) / (T(1) + exp(-u));
      return s * (T(1) - s);
    }
    case ActivationId::Softsign: {
      T a = T(1) + fabs(u);
      return T(1) / (a * a);
    }
    case ActivationId::Relu6: return (u > T(0) && u < T(6)) ? T(1) : T(0);
    case ActivationId::Identity:
    default: return T(1);
  }
}

// act'(u) (exactly activation_derivative's value) and act''(u) into `second`, from one evaluation: the Jacobian
// penalty's gradient needs both (act'' is 0 where act is piecewise linear, as the reference).
template <typename T>
DEQKERN_HOST_DEVICE T activation_derivatives(ActivationId id, T u, T& second) {
  switch (id) {
    case ActivationId::Tanh: {
      T t = tanh(u);
      T s = T(1) - t * t;
      second = T(-2) * t * s;
      return s;
    }
    case ActivationId::Sigmoid: {
      T g = T(1) / (T(1) + exp(-u));
      T s = g * (T(1) - g);
      second = s * (T(1) - T(2) * g);
      return s;
    }
    case ActivationId::Softsign: {
      T a = T(1) + fabs(u);
      T s = T(1) / (a * a);
      T sign = u > T(0) ? T(1) : (u < T(0) ? T(-1) : T(0));
      second = T(-2) * sign * s / a;
      return s;
    }
    case ActivationId::Relu:
    case ActivationId::Relu6:
    case ActivationId::Identity:
    default:  // piecewise linear
      second = T(0);
      return activation_derivative(id, u);
  }
}

}  // namespace deqkern
