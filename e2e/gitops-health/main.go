// gitops-health reads one Kubernetes object (JSON) on stdin and prints how the two GitOps
// tools would judge its health, with their own code rather than a re-implementation:
//   - Argo CD: the object's Lua health script run by gopher-lua, Argo CD's interpreter,
//     with the libraries Argo CD opens, the object as the global `obj`;
//   - Flux (and kubectl wait, cli-utils): kstatus from sigs.k8s.io/cli-utils.
//
// Usage: gitops-health [--lua health.lua] < object.json
// Prints {"argo": {"status", "message"}, "kstatus": {"status", "message"}}.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"

	lua "github.com/yuin/gopher-lua"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	script := flag.String("lua", "", "Argo CD health script (resource.customizations.health)")
	flag.Parse()
	raw, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail("read stdin: %v", err)
	}
	// Integers as int64, as the API machinery decodes them (kstatus reads generations).
	var object map[string]interface{}
	if err := utiljson.Unmarshal(raw, &object); err != nil {
		fail("stdin is not a JSON object: %v", err)
	}
	out := map[string]verdict{}
	if *script != "" {
		argo, err := argoHealth(*script, object)
		if err != nil {
			fail("%s: %v", *script, err)
		}
		out["argo"] = argo
	}
	result, err := status.Compute(&unstructured.Unstructured{Object: object})
	if err != nil {
		fail("kstatus: %v", err)
	}
	out["kstatus"] = verdict{Status: result.Status.String(), Message: result.Message}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail("write: %v", err)
	}
}

// argoHealth runs the script as Argo CD's health assessment does: a state without the
// OS and IO libraries, `obj` set, and a table {status, message} returned.
func argoHealth(path string, object map[string]interface{}) (verdict, error) {
	source, err := os.ReadFile(path)
	if err != nil {
		return verdict{}, err
	}
	state := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer state.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{{lua.LoadLibName, lua.OpenPackage}, {lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable}, {lua.StringLibName, lua.OpenString}, {lua.MathLibName, lua.OpenMath}} {
		state.Push(state.NewFunction(lib.open))
		state.Push(lua.LString(lib.name))
		state.Call(1, 0)
	}
	state.SetGlobal("obj", toLua(state, object))
	if err := state.DoString(string(source)); err != nil {
		return verdict{}, err
	}
	returned, ok := state.Get(-1).(*lua.LTable)
	if !ok {
		return verdict{}, fmt.Errorf("the script returned %s, not a table", state.Get(-1).Type())
	}
	status := returned.RawGetString("status")
	message := returned.RawGetString("message")
	if status.Type() != lua.LTString {
		return verdict{}, fmt.Errorf("hs.status is %s, not a string", status.Type())
	}
	out := verdict{Status: status.String()}
	if message.Type() == lua.LTString {
		out.Message = message.String()
	}
	return out, nil
}

// toLua converts decoded JSON as Argo CD does: objects and arrays become tables (arrays
// indexed from 1), JSON null becomes nil.
func toLua(state *lua.LState, value interface{}) lua.LValue {
	switch v := value.(type) {
	case map[string]interface{}:
		table := state.NewTable()
		for key, item := range v {
			table.RawSetString(key, toLua(state, item))
		}
		return table
	case []interface{}:
		table := state.NewTable()
		for _, item := range v {
			table.Append(toLua(state, item))
		}
		return table
	case string:
		return lua.LString(v)
	case int64:
		return lua.LNumber(v)
	case float64:
		return lua.LNumber(v)
	case bool:
		return lua.LBool(v)
	default:
		return lua.LNil
	}
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "gitops-health: "+format+"\n", args...)
	os.Exit(2)
}
